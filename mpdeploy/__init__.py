"""mpdeploy: Marchenko-Pastur N:M pruning to sparse inference engines, with audited speed and accuracy."""

__version__ = "0.1.0"
