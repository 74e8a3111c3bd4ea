"""Config, stage graph, Ray runner and output writer."""
