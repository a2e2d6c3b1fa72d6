"""Model sources below rora.models.load_model: readers that turn a foreign file into a Llama-family model."""
