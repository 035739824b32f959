# envelope: from=MAILER-DAEMON@mx.example.net to=bob@example.com message=messages/bounce.eml
require ["fileinto", "envelope"];
if envelope :matches "from" "*" {
  fileinto "yes";
} else {
  fileinto "no";
}
