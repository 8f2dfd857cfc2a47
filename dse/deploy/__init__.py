"""Deployment: the model as a Relax graph, the exported artifact, export itself and the bench against PyTorch."""
