"""Evaluations that judge a recipe by what it trains: `winnow eval train` (train_eval, train_report)."""
