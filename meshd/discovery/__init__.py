"""Finding peers and merging what they host into one catalog."""
