"""Serving: start a LaunchPlan, wait until it is really ready, watch it, and stop everything it started."""
