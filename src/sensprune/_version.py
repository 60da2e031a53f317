"""The package version, in one place (imported by the package face and by the modules that
record it in run files)."""

__version__ = "0.1.0"
