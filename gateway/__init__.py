"""The running system: HTTP edge, upstream calls, replay servers, trainer loop and CLI."""
import os

# litellm otherwise downloads its price map at import time; machines here have no internet.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
