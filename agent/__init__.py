"""campus-agent: the edge daemon of a school gateway."""

__version__ = "0.1.0"
