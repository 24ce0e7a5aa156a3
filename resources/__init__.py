"""FLENwheel resources (installed as `flen_resources`): lineage, DVC storage, image and face tools, editors."""
