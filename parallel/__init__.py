"""Building blocks of the gpt-oss launcher: config, layout, mesh, loading, harmony, coordinator."""
