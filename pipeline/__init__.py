"""Beam jobs (encode, decode) and the formats they read and write; loads only the model artifact."""
