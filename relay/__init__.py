"""eimis-relay: a hospital's gateway to the national health-messaging space."""

__version__ = "0.1.0"
