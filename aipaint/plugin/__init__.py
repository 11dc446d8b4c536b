"""The plugin system: hookspecs, the host, the registry, the registration records, and the kit plugins share."""
