"""vidcap: caption directories of videos with an omni model served by vLLM."""

__version__ = "0.1.0"
