"""One inference engine: load base (+ adapter), batch, generate, stop on the model's end-of-turn tokens."""
