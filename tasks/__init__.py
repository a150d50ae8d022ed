"""Pipeline stages of tok1d: each a plain function (config + input manifests -> output manifest)."""
