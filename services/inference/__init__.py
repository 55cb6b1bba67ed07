"""The inference service: frames in, predictions out."""
