"""What a run writes and checks after its stages: the mix into shards, manifest, publish, report, verify."""
