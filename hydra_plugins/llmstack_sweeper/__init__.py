"""llmstack's Hydra sweeper: the basic grid, plus linked (zipped) axes and load axes kept in one job."""
