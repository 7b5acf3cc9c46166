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
