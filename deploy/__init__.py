"""Running Substrate under compose: the broker's definitions, made from the code, and the demo
job that fills the fleet."""
