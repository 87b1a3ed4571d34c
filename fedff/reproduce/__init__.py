"""`fedff reproduce`: the README's results tables, each as one command."""
