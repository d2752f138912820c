"""Models of paper A.3 (distorted MNIST): written by the digits helper."""
