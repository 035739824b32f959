# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "relational"];
if header :value "lt" "subject" "X" {
  fileinto "yes";
} else {
  fileinto "no";
}
