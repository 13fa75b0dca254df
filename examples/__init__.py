"""Runnable rulework workflows: `images` (an image-upload pipeline) and `build` (a software build)."""
