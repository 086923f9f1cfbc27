"""Configuration: the structured-config schemas (`schema`), composing a config from the config dir
(`compose`), hybrid layer patterns (`hybrid`), value checks (`validation`) and OmegaConf resolvers
(`resolvers`). Imports only `archifactory.core`."""
