"""The machinery that plans, caches and runs stages: the stage contract, the stage cache, passes, runner options."""
