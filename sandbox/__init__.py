"""Local stand-ins for providers, for the demo, tests and benchmarks (not the serving runtime):
replay upstream, reward model and verifier with fault switches, demo configs, servers on loopback."""
import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
