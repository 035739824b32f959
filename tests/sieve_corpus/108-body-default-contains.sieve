# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "body"];
if body :contains "magic word" {
  fileinto "yes";
} else {
  fileinto "no";
}
