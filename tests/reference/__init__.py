"""Reference side of the parity tests: tortoise-tts 3.0.0 itself, on random weights."""
