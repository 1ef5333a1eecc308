"""gradsweep's analysis: tables and plots rebuilt from the results store."""
