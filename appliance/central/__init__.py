"""The central team's side of model updates: the TUF repository, publishing to Blob Storage, rollouts."""
