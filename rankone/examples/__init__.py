"""The built-in offline example: a suite of small tasks, a tiny CLIP, its experts (`rankone demo`)."""
