"""Typed run config: schema (dataclasses), ConfigStore registration, resolution and validation rules."""
