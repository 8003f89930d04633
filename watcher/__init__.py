"""smooth-watcher: watch drop folders and upload every new or changed file to the Smooth API."""

__version__ = "0.1.0"
