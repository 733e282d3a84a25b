"""Tables, plots and overlay pictures of results."""
