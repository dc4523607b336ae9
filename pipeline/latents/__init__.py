"""The latent dataset: a folder of Parquet parts and the manifest that makes it complete.

    from pipeline import latents
    latents.schema(columns, codec_metadata, fingerprint, "code")   # a part's schema (pipeline.codec.schema_of)
    latents.write_part(path, tables, schema, "code")                 # one part, whole
    latents.require_intact(folder, latents.part_paths(folder, manifest), manifest["files"], checksums=True)

`schema.py` (rows, columns, metadata), `parts.py` (writing and checking parts), `manifest.py`
(the completion marker's content). It imports no codec: a codec's columns are passed in.
"""
from pipeline.latents.manifest import MANIFEST, inconsistencies, manifest, read_manifest, unlisted_parts  # noqa: F401
from pipeline.latents.parts import (ROW_GROUP_BYTES, ROW_GROUP_ROWS, check_part, describe_parts,  # noqa: F401
                                    file_crc32c, part_paths, require_intact, write_part, writer_options)
from pipeline.latents.schema import (COLUMN_SINCE, FEATURES, FORMAT_VERSION, LATENT_FORMATS,  # noqa: F401
                                     MEMBERS, METADATA_KEY, PART_PREFIX, READABLE_VERSIONS, extra_names, latents_of, metadata_of, schema,
                                     to_table)
