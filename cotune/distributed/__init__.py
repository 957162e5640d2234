"""The base sharded across ranks (DeepSpeed ZeRO-3), and the planner of placements."""
