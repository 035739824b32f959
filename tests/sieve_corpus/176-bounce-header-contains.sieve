# envelope: from=MAILER-DAEMON@mx.example.net to=bob@example.com message=messages/bounce.eml
require ["fileinto"];
if header :contains "auto-submitted" "auto" {
  fileinto "yes";
} else {
  fileinto "no";
}
