"""On-cluster captioning: `vidcap job submit --caption PATH [--shards N]` runs `vidcap caption` inside the
job, next to its own server, and writes records under the profile's captions_dir/<model tag>/ (the place
`vidcap sync` brings home to ./captions/<model tag>/, where a laptop run writes too)."""

from __future__ import annotations

import posixpath

from vidcap import jobscript
from vidcap.config import Config, Profile, model_tag
from vidcap.jobs import choose_preset


def cluster_out_dir(cfg: Config, profile: Profile) -> str:
    """The cluster output dir of the profile's model: ``<captions_dir>/<model tag>`` (absolute, or
    relative to the cluster home)."""
    base = jobscript.home_relative(profile.paths.captions_dir, "paths.captions_dir").rstrip("/") or "/"
    tag = model_tag(choose_preset(cfg, profile).model)
    return tag if base == "." else posixpath.join(base, tag)
