# Consul agent settings shared by the native stack and compose.yml.
# Both run a single dev-mode agent (server + client, in-memory state); ports
# and bind addresses are given on the command line, since they differ.

ui_config {
  enabled = true
}

dns_config {
  # Envoy re-resolves gateway.service.consul every second; a zero TTL keeps
  # answers fresh, and only passing instances are ever returned.
  service_ttl {
    "*" = "0s"
  }
  only_passing = true
}

log_level = "WARN"
