{{- define "kubetune.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{ else }}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{ end }}
{{- end }}

{{- define "kubetune.labels" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "kubetune.selector" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kubetune.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "kubetune.redisSecret" -}}
{{ .Values.redis.existingSecret | default (printf "%s-redis" (include "kubetune.fullname" .)) }}
{{- end }}

{{- define "kubetune.redisUrl" -}}
{{- if .Values.redis.enabled }}redis://{{ include "kubetune.fullname" . }}-redis.{{ .Release.Namespace }}.svc:6379/0{{ else }}{{ required "redis.url is required when redis.enabled is false" .Values.redis.url }}{{ end }}
{{- end }}

{{- /* The Secret with the CA of an external Redis's TLS certificate ("" for none), checked against the rest. */}}
{{- define "kubetune.redisCaSecret" -}}
{{- with .Values.redis.tls.caSecret }}
{{- if $.Values.redis.enabled }}{{ fail "redis.tls.caSecret is for an external Redis: set redis.enabled=false and redis.url=rediss://..." }}{{ end }}
{{- if not (hasPrefix "rediss://" $.Values.redis.url) }}{{ fail "redis.tls.caSecret needs a TLS redis.url (rediss://...)" }}{{ end }}
{{- . }}
{{- end }}
{{- end }}

{{- define "kubetune.suggestionUrl" -}}
http://{{ include "kubetune.fullname" . }}-suggestion.{{ .Release.Namespace }}.svc:{{ .Values.suggestion.port }}
{{- end }}

{{- define "kubetune.securityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {drop: [ALL]}
{{- end }}
