"""Loss functions shared by several methods."""
