"""OpenAI-compatible HTTP serving (`moeforge serve`); see docs/serving.md."""
