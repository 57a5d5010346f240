"""Example models of your own, shipped with the package (see the README's "Your own model")."""
