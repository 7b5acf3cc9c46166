{{- define "flowmap.labels" -}}
app.kubernetes.io/name: flowmap
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "flowmap.selector" -}}
app.kubernetes.io/name: flowmap
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "flowmap.secret" -}}
{{- if .Values.collector.existingSecret -}}
{{ .Values.collector.existingSecret }}
{{- else -}}
{{ .Release.Name }}-api-key
{{- end -}}
{{- end -}}

{{- /* The map page's --listen: loopback, or any address with a token. */ -}}
{{- define "flowmap.webListen" -}}
{{- $a := .Values.web.address -}}
{{- $loopback := or (hasPrefix "127." $a) (eq $a "::1") -}}
{{- if and (not $loopback) (not .Values.web.tokenSecret) -}}
{{- fail (printf "web.address %s is not loopback: the map page there needs a bearer token; set web.tokenSecret to a Secret with the key token" $a) -}}
{{- end -}}
{{- if contains ":" $a -}}
[{{ $a }}]:{{ .Values.web.port }}
{{- else -}}
{{ $a }}:{{ .Values.web.port }}
{{- end -}}
{{- end -}}

{{- /* The hub's PostgreSQL Secret (required with the hub). */ -}}
{{- define "flowmap.hubDatabase" -}}
{{- required "hub.databaseSecret is required with hub.enabled: a Secret with the key connection-string (the PostgreSQL connection string)" .Values.hub.databaseSecret -}}
{{- end -}}

{{- /* The hub's pods: a name of their own, so the DaemonSet's selector
       never matches them. */ -}}
{{- define "flowmap.hubSelector" -}}
app.kubernetes.io/name: flowmap-hub
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "flowmap.hubLabels" -}}
{{ include "flowmap.hubSelector" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: hub
{{- end -}}
