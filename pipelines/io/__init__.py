"""Record I/O and storage: reading inputs, typed blocks, cache files, ordered output files, paths on any filesystem."""
