"""The `latentpack` command, above both packages: `training` (train and export a model
artifact) and `pipeline` (the Beam jobs that read it). See latentpack/cli.py."""
