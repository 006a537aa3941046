"""The SpacemiT K1/K3 descriptor lives in descriptor.json beside this file."""
