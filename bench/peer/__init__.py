"""Helpers of bench/peer_speed.py: LLaMA-Factory's own environment, its run configs, the runs' children."""
