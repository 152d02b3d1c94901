"""kdistill."""
