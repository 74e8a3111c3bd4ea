"""counterfactory: paired counterfactual image/video data for vision-language models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("counterfactory")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
